import Foundation

/// A minimal byte-level BPE tokenizer reading a Hugging Face `tokenizer.json` (GPT-2, Qwen,
/// Llama 3 style): the BPE vocabulary and merges, the added tokens, an optional NFC normalizer,
/// the ByteLevel (or Split + ByteLevel) pre-tokenizer, and the ByteLevel decoder.
///
/// `encode` splits out added tokens (exact text), normalizes and pre-tokenizes the rest, spells
/// each piece's UTF-8 bytes with GPT-2's byte map and merges it by BPE rank. It adds no special
/// tokens (no post-processor template: put a BOS in the prompt ids yourself if the model wants
/// one). Not supported (and refused when `tokenizer.json` asks for them): SentencePiece/Metaspace
/// or WordPiece models, byte fallback, dropout, other normalizers and pre-tokenizers.
public final class Tokenizer {
    /// Token text -> id, for the BPE vocabulary and the added tokens.
    public let vocab: [String: Int]
    /// Id -> token text.
    public let tokens: [Int: String]
    /// Ids of added tokens marked `special` (left out by `decode` unless asked).
    public let specialIDs: Set<Int>

    private let ranks: [Pair: Int]
    private let added: [(text: String, id: Int)]  // longest first
    private let nfc: Bool
    private let preTokenizer: PreTokenizer
    private let ignoreMerges: Bool
    private let unknownID: Int?
    private var cache: [String: [Int]] = [:]

    private struct Pair: Hashable {
        let left: String
        let right: String
    }

    /// Reads `tokenizer.json` in `folder` (the `<stem>.tokenizer/` folder that
    /// `mlx-zeta export-coreml --copy-tokenizer` writes, or a checkpoint folder).
    public convenience init(folder: URL) throws {
        let url = folder.appendingPathComponent(Contract.tokenizerFile)
        guard let data = FileManager.default.contents(atPath: url.path) else {
            throw SampleError("[Tokenizer] \(url.path) is missing (expected a Hugging Face tokenizer.json)")
        }
        try self.init(json: data, source: url.path)
    }

    /// Parses the contents of a `tokenizer.json`; `source` names it in errors.
    public init(json data: Data, source: String = "tokenizer.json") throws {
        guard let root = try JSONSerialization.jsonObject(with: data) as? [String: Any],
              let model = root["model"] as? [String: Any] else {
            throw SampleError("[Tokenizer] \(source) is not a tokenizer.json (no \"model\" object)")
        }
        guard (model["type"] as? String) == "BPE", let vocab = model["vocab"] as? [String: Int] else {
            throw SampleError("[Tokenizer] \(source): unsupported model \(model["type"] ?? "?") (expected a byte-level BPE)")
        }
        if model["byte_fallback"] as? Bool == true {
            throw SampleError("[Tokenizer] \(source): BPE byte_fallback is not supported (a SentencePiece-style BPE)")
        }
        if let dropout = model["dropout"], !(dropout is NSNull) {
            throw SampleError("[Tokenizer] \(source): BPE dropout is not supported, got \(dropout)")
        }
        var ranks: [Pair: Int] = [:]
        for (rank, merge) in (model["merges"] as? [Any] ?? []).enumerated() {
            let parts = (merge as? [String]) ?? (merge as? String)?.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
            guard let parts, parts.count == 2 else {
                throw SampleError("[Tokenizer] \(source): merge \(rank) is not a pair of tokens: \(merge)")
            }
            if ranks[Pair(left: parts[0], right: parts[1])] == nil { ranks[Pair(left: parts[0], right: parts[1])] = rank }
        }
        var all = vocab
        var added: [(String, Int)] = []
        var special = Set<Int>()
        for token in root["added_tokens"] as? [[String: Any]] ?? [] {
            guard let id = token["id"] as? Int, let content = token["content"] as? String, !content.isEmpty else { continue }
            all[content] = id
            added.append((content, id))
            if token["special"] as? Bool == true { special.insert(id) }
        }
        self.vocab = all
        self.tokens = Dictionary(all.map { ($0.value, $0.key) }, uniquingKeysWith: { first, _ in first })
        self.specialIDs = special
        self.ranks = ranks
        self.added = added.sorted { $0.0.utf16.count > $1.0.utf16.count }
        self.nfc = try Tokenizer.isNFC(root["normalizer"], source: source)
        self.preTokenizer = try PreTokenizer.from(json: root["pre_tokenizer"] as? [String: Any])
        self.ignoreMerges = model["ignore_merges"] as? Bool ?? false
        self.unknownID = (model["unk_token"] as? String).flatMap { vocab[$0] }
    }

    /// Whether the normalizer is NFC (true) or absent (false); throws for any other.
    private static func isNFC(_ json: Any?, source: String) throws -> Bool {
        guard let json = json as? [String: Any] else { return false }  // null or absent
        switch json["type"] as? String {
        case "NFC": return true
        case "Sequence" where (json["normalizers"] as? [Any])?.isEmpty == true: return false
        default: throw SampleError("[Tokenizer] \(source): unsupported normalizer \(json["type"] ?? "?") (expected none or NFC)")
        }
    }

    /// Token ids of `text` (no special tokens added; see the type's documentation).
    ///
    /// - Throws: `SampleError` when a piece spells a symbol the vocabulary lacks and there is no
    ///   unknown token.
    public func encode(_ text: String) throws -> [Int] {
        var ids: [Int] = []
        for (segment, addedID) in splitAdded(text) {
            if let addedID {
                ids.append(addedID)
                continue
            }
            let normalized = nfc ? segment.precomposedStringWithCanonicalMapping : segment
            for piece in preTokenizer.split(normalized) { ids += try bpe(piece) }
        }
        return ids
    }

    /// The text of `ids`: each token's bytes (GPT-2 byte map), joined and read as UTF-8 (an invalid
    /// sequence becomes U+FFFD). Special added tokens are left out unless `skipSpecialTokens` is false.
    public func decode(_ ids: [Int], skipSpecialTokens: Bool = true) -> String {
        var bytes: [UInt8] = []
        for id in ids {
            if skipSpecialTokens && specialIDs.contains(id) { continue }
            guard let token = tokens[id] else { continue }  // an id outside the vocabulary has no text
            bytes += ByteLevel.bytes(of: token)
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// `text` cut around the added tokens it contains: `(segment, nil)` for plain text and
    /// `(content, id)` for an added token (leftmost first, the longest at one position).
    private func splitAdded(_ text: String) -> [(String, Int?)] {
        guard !added.isEmpty else { return [(text, nil)] }
        let units = Array(text.utf16)
        let addedUnits = added.map { (Array($0.text.utf16), $0.id) }
        var out: [(String, Int?)] = []
        var start = 0
        var i = 0
        while i < units.count {
            if let (token, id) = addedUnits.first(where: { units.count - i >= $0.0.count && Array(units[i..<i + $0.0.count]) == $0.0 }) {
                if start < i { out.append((String(decoding: units[start..<i], as: UTF16.self), nil)) }
                out.append((String(decoding: token, as: UTF16.self), id))
                i += token.count
                start = i
            } else {
                i += 1
            }
        }
        if start < units.count { out.append((String(decoding: units[start..<units.count], as: UTF16.self), nil)) }
        return out
    }

    /// The ids of one pre-tokenized piece: its bytes spelled with the byte map, then adjacent
    /// symbols merged, lowest merge rank first (all non-overlapping occurrences, left to right),
    /// until no adjacent pair has a rank.
    private func bpe(_ piece: String) throws -> [Int] {
        if let hit = cache[piece] { return hit }
        var symbols = ByteLevel.encode(piece).map { String($0) }
        if ignoreMerges, let id = vocab[symbols.joined()] { return [id] }
        while symbols.count > 1 {
            var best: (rank: Int, pair: Pair)?
            for k in 0..<(symbols.count - 1) {
                let pair = Pair(left: symbols[k], right: symbols[k + 1])
                if let rank = ranks[pair], rank < (best?.rank ?? Int.max) { best = (rank, pair) }
            }
            guard let best else { break }
            var merged: [String] = []
            var k = 0
            while k < symbols.count {
                if k + 1 < symbols.count, symbols[k] == best.pair.left, symbols[k + 1] == best.pair.right {
                    merged.append(best.pair.left + best.pair.right)
                    k += 2
                } else {
                    merged.append(symbols[k])
                    k += 1
                }
            }
            symbols = merged
        }
        let ids = try symbols.map { symbol -> Int in
            guard let id = vocab[symbol] ?? unknownID else {
                throw SampleError("[Tokenizer] the vocabulary has no token \"\(symbol)\" (from \"\(piece)\") and no unk_token")
            }
            return id
        }
        cache[piece] = ids
        return ids
    }
}
