// Every name the sample relies on, in one place. tests/test_swift_contract.py (in the mlx-zeta
// repository, run on Linux) parses the `static let` lines of this file and checks each value
// against the spec of a package exported by mlx-zeta's `export_decoder`, so the two cannot drift:
// keep every constant a single-line `static let NAME = LITERAL` (a string or an integer).

/// The contract of a decoder package written by `mlx-zeta export-coreml` (mlx-zeta's
/// `converters/coreml/stateful.py`, `export_decoder`).
///
/// One `.mlpackage` holds several functions that share their weights and their state:
///
/// - `prefill_{L}` for each exported prefill length L: inputs `input_ids` (B, L) int32 and
///   `position` (1,) int32; output `logits` (B, L, vocab) float32.
/// - `decode` (the default function): `input_ids` (B, 1) int32, `position` (1,) int32;
///   output `logits` (B, 1, vocab) float32.
/// - states `k_cache_{i}` / `v_cache_{i}` (i = 0 ..< layers), float16,
///   shape (B, kv_heads, capacity, head_dim).
///
/// A call writes its tokens' keys and values at `position ..< position + T` and query i attends
/// the keys at `j <= position + i`. A prompt of n tokens is right-padded to the chosen L; the next
/// token comes from `logits[0, n - 1]`; the next call starts at `position + n` (padding slots are
/// overwritten later and never attended). The caller keeps `position + T <= capacity`.
public enum Contract {
    // MARK: functions

    /// The one-token function (also the package's default function).
    public static let decodeFunction = "decode"
    /// Prefix of the prompt functions; the suffix is the decimal prefill length (`prefill_64`).
    public static let prefillFunctionPrefix = "prefill_"

    // MARK: inputs and outputs

    /// Token ids (B, L) int32, right-padded to L.
    public static let inputIDs = "input_ids"
    /// (1,) int32: the cache index of `input_ids[:, 0]`.
    public static let position = "position"
    /// (B, L, vocab) float32: next-token logits for each input position.
    public static let logits = "logits"

    // MARK: states

    /// Prefix of layer i's key cache state (`k_cache_0`, ...).
    public static let keyCachePrefix = "k_cache_"
    /// Prefix of layer i's value cache state (`v_cache_0`, ...).
    public static let valueCachePrefix = "v_cache_"
    /// The axis of a cache state's shape (B, kv_heads, capacity, head_dim) that is the capacity.
    public static let stateCapacityAxis = 2

    // MARK: data types (Core ML multi-array types, by name; see `Generator` for the mapping)

    public static let inputIDsDataType = "int32"
    public static let positionDataType = "int32"
    public static let logitsDataType = "float32"
    public static let stateDataType = "float16"

    // MARK: shapes

    /// Rows per call the sample drives (the package's `mlx_zeta.batch`; it must be 1 here).
    public static let batch = 1

    // MARK: files beside the package

    /// `mlx-zeta export-coreml --copy-tokenizer` copies the tokenizer files of `OUT/model.mlpackage`
    /// into `OUT/model` + this suffix (`OUT/model.tokenizer/`).
    public static let tokenizerFolderSuffix = ".tokenizer"
    /// The tokenizer file the sample reads (Hugging Face `tokenizers` format).
    public static let tokenizerFile = "tokenizer.json"
}

/// Keys of the package's user-defined metadata (`MLModelMetadataKey.creatorDefinedKey`, a
/// `[String: String]`; lists and integers are JSON text) that the sample reads.
public enum MetadataKey {
    /// `"causal-lm"` for a decoder package.
    public static let task = "mlx_zeta.task"
    /// Cache positions (prompt + generated tokens), e.g. `"512"`.
    public static let capacity = "mlx_zeta.capacity"
    /// The exported prefill lengths, a JSON list, e.g. `"[64, 256]"`.
    public static let prefillLengths = "mlx_zeta.prefill_lengths"
    /// The package's function names, a JSON list.
    public static let functions = "mlx_zeta.functions"
    /// Vocabulary size (the logits' last axis).
    public static let vocabSize = "mlx_zeta.vocab_size"
    /// Rows per call (B).
    public static let batch = "mlx_zeta.batch"
    /// `"right"`: prompts are right-padded to the prefill length.
    public static let padding = "mlx_zeta.padding"
    /// The begin-of-text id (JSON int or null); the sample does not add it, the prompt does.
    public static let bosTokenID = "mlx_zeta.bos_token_id"
    /// End-of-text ids, a JSON list: generation stops after drawing one.
    public static let eosTokenIDs = "mlx_zeta.eos_token_ids"
    /// The padding id (JSON int or null); the sample pads prompts with it (0 when null).
    public static let padTokenID = "mlx_zeta.pad_token_id"
    /// Names of the tokenizer files copied beside the package, a JSON list.
    public static let tokenizerFiles = "mlx_zeta.tokenizer_files"
}
