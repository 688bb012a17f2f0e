import Foundation

/// An error of the sample, with a one-line message naming what is wrong and what was expected.
public struct SampleError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// What a decoder package says about itself in its user-defined metadata (`MetadataKey`):
/// capacity, prefill lengths, vocabulary and special token ids. Pure Swift (no Core ML), so it
/// can be built and tested on any platform.
public struct PackageInfo: Equatable {
    /// Cache positions: prompt plus generated tokens never exceed it.
    public var capacity: Int
    /// The exported prefill lengths, sorted ascending.
    public var prefillLengths: [Int]
    /// The logits' last axis.
    public var vocabSize: Int
    /// Begin-of-text id, if the checkpoint has one (informational: prompts carry it themselves).
    public var bosTokenID: Int?
    /// End-of-text ids: generation stops after drawing one of them.
    public var eosTokenIDs: [Int]
    /// The id prompts are right-padded with (0 when the checkpoint has none: padded slots are
    /// never attended, so any id in range will do).
    public var padTokenID: Int
    /// Names of the tokenizer files copied beside the package.
    public var tokenizerFiles: [String]

    public init(capacity: Int, prefillLengths: [Int], vocabSize: Int, bosTokenID: Int? = nil,
                eosTokenIDs: [Int] = [], padTokenID: Int = 0, tokenizerFiles: [String] = []) {
        self.capacity = capacity
        self.prefillLengths = prefillLengths.sorted()
        self.vocabSize = vocabSize
        self.bosTokenID = bosTokenID
        self.eosTokenIDs = eosTokenIDs
        self.padTokenID = padTokenID
        self.tokenizerFiles = tokenizerFiles
    }

    /// Reads the metadata of a decoder package.
    ///
    /// - Parameter metadata: the package's creator-defined metadata (all values strings; lists
    ///   and integers as JSON).
    /// - Throws: `SampleError` naming the key when a required key (`capacity`, `prefill_lengths`,
    ///   `vocab_size`) is missing or malformed, or when the package is not a right-padded
    ///   batch-1 causal LM.
    public init(metadata: [String: String]) throws {
        func json(_ key: String) throws -> Any? {
            guard let text = metadata[key] else { return nil }
            do {
                return try JSONSerialization.jsonObject(with: Data(text.utf8), options: [.fragmentsAllowed])
            } catch {
                throw SampleError("[PackageInfo] metadata \(key) is not JSON: \(text)")
            }
        }
        func int(_ key: String) throws -> Int? {
            guard let value = try json(key), !(value is NSNull) else { return nil }
            guard let number = value as? Int else {
                throw SampleError("[PackageInfo] expected metadata \(key) to be an integer, got \(metadata[key]!)")
            }
            return number
        }
        func required(_ key: String) throws -> Int {
            guard let value = try int(key) else {
                throw SampleError("[PackageInfo] the package has no metadata \(key) (export it with mlx-zeta export-coreml)")
            }
            return value
        }
        func list<T>(_ key: String, of type: T.Type) throws -> [T]? {
            guard let value = try json(key), !(value is NSNull) else { return nil }
            guard let items = value as? [T] else {
                throw SampleError("[PackageInfo] expected metadata \(key) to be a JSON list of \(T.self), got \(metadata[key]!)")
            }
            return items
        }

        if let task = metadata[MetadataKey.task], task != "causal-lm" {
            throw SampleError("[PackageInfo] expected \(MetadataKey.task) \"causal-lm\", got \"\(task)\"")
        }
        if let padding = metadata[MetadataKey.padding], padding != "right" {
            throw SampleError("[PackageInfo] expected \(MetadataKey.padding) \"right\", got \"\(padding)\"")
        }
        if let batch = try int(MetadataKey.batch), batch != Contract.batch {
            throw SampleError("[PackageInfo] expected \(MetadataKey.batch) \(Contract.batch), got \(batch)")
        }
        guard let lengths = try list(MetadataKey.prefillLengths, of: Int.self), !lengths.isEmpty else {
            throw SampleError("[PackageInfo] the package has no metadata \(MetadataKey.prefillLengths) (a JSON list of ints)")
        }
        self.init(capacity: try required(MetadataKey.capacity), prefillLengths: lengths,
                  vocabSize: try required(MetadataKey.vocabSize), bosTokenID: try int(MetadataKey.bosTokenID),
                  eosTokenIDs: try list(MetadataKey.eosTokenIDs, of: Int.self) ?? [],
                  padTokenID: try int(MetadataKey.padTokenID) ?? 0,
                  tokenizerFiles: try list(MetadataKey.tokenizerFiles, of: String.self) ?? [])
        if capacity < 1 || prefillLengths.contains(where: { $0 < 1 || $0 > capacity }) {
            throw SampleError("[PackageInfo] expected prefill lengths in 1...\(capacity) (the capacity), got \(prefillLengths)")
        }
    }

    /// The function that runs `length` prompt tokens (`prefill_64`).
    public static func prefillFunction(_ length: Int) -> String { Contract.prefillFunctionPrefix + String(length) }

    /// The name of layer `layer`'s key cache state (`k_cache_0`).
    public static func keyCache(_ layer: Int) -> String { Contract.keyCachePrefix + String(layer) }

    /// The name of layer `layer`'s value cache state (`v_cache_0`).
    public static func valueCache(_ layer: Int) -> String { Contract.valueCachePrefix + String(layer) }
}

/// One prefill call: run `function` (a `prefill_{length}`) on `count` prompt tokens (right-padded
/// to `length`) written at cache index `position`.
public struct PrefillCall: Equatable {
    public var length: Int
    public var count: Int
    public var position: Int
    public var function: String { PackageInfo.prefillFunction(length) }
}

/// The prefill calls for a prompt of `tokens` ids written from cache index `start`, by the
/// package's "choice of function": the smallest prefill length L that holds the tokens left;
/// if none does, the largest L on the next L tokens, and repeat.
///
/// - Throws: `SampleError` when the prompt is empty, or when a call would write past `capacity`
///   (a padded call writes all L slots, so `position + L <= capacity` must hold for each).
public func prefillPlan(tokens: Int, start: Int = 0, lengths: [Int], capacity: Int) throws -> [PrefillCall] {
    let sorted = lengths.sorted()
    guard tokens > 0, let largest = sorted.last else {
        throw SampleError("[prefillPlan] expected a prompt of at least one token and one prefill length, got \(tokens) token(s), lengths \(lengths)")
    }
    var calls: [PrefillCall] = []
    var left = tokens
    var position = start
    while left > 0 {
        let length = sorted.first(where: { $0 >= left }) ?? largest
        let count = min(left, length)
        if position + length > capacity {
            throw SampleError("[prefillPlan] a prompt of \(tokens) token(s) from position \(start) needs \(PackageInfo.prefillFunction(length)) at position \(position), past the capacity \(capacity)")
        }
        calls.append(PrefillCall(length: length, count: count, position: position))
        left -= count
        position += count
    }
    return calls
}
