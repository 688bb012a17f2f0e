import Foundation

/// GPT-2's byte-level encoding: every byte gets a printable Unicode scalar, so a BPE vocabulary of
/// strings can spell any byte sequence. Bytes `!`...`~`, `¡`...`¬` and `®`...`ÿ` stand for
/// themselves; the others (controls, space, DEL, NBSP, soft hyphen, ...) take the scalars from
/// U+0100 on, in byte order (space becomes `Ġ`, newline `Ċ`).
public enum ByteLevel {
    /// Scalar of each byte (index: the byte).
    public static let byteToScalar: [Unicode.Scalar] = {
        let kept = Set(Array(33...126) + Array(161...172) + Array(174...255))
        var next = 256
        return (0..<256).map { byte in
            if kept.contains(byte) { return Unicode.Scalar(UInt8(byte)) }
            defer { next += 1 }
            return Unicode.Scalar(UInt32(next))!
        }
    }()

    /// The byte each scalar of `byteToScalar` stands for.
    public static let scalarToByte: [Unicode.Scalar: UInt8] = {
        var out: [Unicode.Scalar: UInt8] = [:]
        for (byte, scalar) in byteToScalar.enumerated() { out[scalar] = UInt8(byte) }
        return out
    }()

    /// The byte-level spelling of `text`'s UTF-8 bytes, one scalar per byte.
    public static func encode(_ text: String) -> [Unicode.Scalar] {
        text.utf8.map { byteToScalar[Int($0)] }
    }

    /// The bytes a token spells: each scalar's byte, or, as the `tokenizers` library does, the
    /// token's own UTF-8 bytes when one of its scalars is not in the byte map (e.g. an added token
    /// written in plain text).
    public static func bytes(of token: String) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(token.unicodeScalars.count)
        for scalar in token.unicodeScalars {
            guard let byte = scalarToByte[scalar] else { return Array(token.utf8) }
            out.append(byte)
        }
        return out
    }

    /// GPT-2's split pattern (the `tokenizers` ByteLevel pre-tokenizer with `use_regex`):
    /// contractions, letters, digits and other symbols each with one optional leading space, and
    /// runs of whitespace.
    public static let gpt2Pattern =
        #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#
}

/// Splits text into the pieces BPE encodes separately: the matches of a regular expression and
/// the text between them ("isolated" splitting, as the `tokenizers` library's ByteLevel and
/// `Split` pre-tokenizers do), after an optional leading space.
public struct PreTokenizer {
    /// The split pattern (ICU syntax, as `NSRegularExpression`); nil: the whole text is one piece.
    public let pattern: NSRegularExpression?
    /// Prepend a space to text that does not start with one (ByteLevel `add_prefix_space`).
    public let addPrefixSpace: Bool

    public init(pattern: String?, addPrefixSpace: Bool) throws {
        self.pattern = try pattern.map { try NSRegularExpression(pattern: $0) }
        self.addPrefixSpace = addPrefixSpace
    }

    /// The pieces of `text`, in order; joined they give `text` (plus the prefix space, if added).
    public func split(_ text: String) -> [String] {
        var text = text
        if addPrefixSpace, let first = text.unicodeScalars.first, first != " " {  // scalars: " " + a combining mark is one Character
            text = " " + text
        }
        guard let pattern else { return text.isEmpty ? [] : [text] }
        // Work in UTF-16 offsets, as NSRegularExpression does: slicing the String itself would
        // round to Character boundaries and glue a combining mark back onto its letter.
        let units = Array(text.utf16)
        func piece(_ lower: Int, _ upper: Int) -> String { String(decoding: units[lower..<upper], as: UTF16.self) }
        var pieces: [String] = []
        var last = 0
        for match in pattern.matches(in: text, range: NSRange(location: 0, length: units.count)) {
            let range = match.range
            guard range.location != NSNotFound, range.length > 0 else { continue }
            if last < range.location { pieces.append(piece(last, range.location)) }
            pieces.append(piece(range.location, range.location + range.length))
            last = range.location + range.length
        }
        if last < units.count { pieces.append(piece(last, units.count)) }
        return pieces
    }

    /// The pre-tokenizer a `tokenizer.json` describes: `ByteLevel` (its `add_prefix_space` and
    /// `use_regex`), or a `Sequence` of one `Split` (an "Isolated" regex or string, not inverted)
    /// and a `ByteLevel` without regex or prefix space, as Llama 3 and Qwen tokenizers write.
    ///
    /// - Throws: `SampleError` naming any other pre-tokenizer (this tokenizer does not support it).
    public static func from(json: [String: Any]?) throws -> PreTokenizer {
        guard let json else { return try PreTokenizer(pattern: nil, addPrefixSpace: false) }
        switch json["type"] as? String {
        case "ByteLevel":
            let useRegex = json["use_regex"] as? Bool ?? true
            return try PreTokenizer(pattern: useRegex ? ByteLevel.gpt2Pattern : nil,
                                    addPrefixSpace: json["add_prefix_space"] as? Bool ?? true)
        case "Sequence":
            let steps = json["pretokenizers"] as? [[String: Any]] ?? []
            let types = steps.map { $0["type"] as? String ?? "?" }
            guard types == ["Split", "ByteLevel"], (steps[1]["use_regex"] as? Bool) == false,
                  steps[1]["add_prefix_space"] as? Bool != true,
                  steps[0]["behavior"] as? String == "Isolated", steps[0]["invert"] as? Bool != true,
                  let pattern = steps[0]["pattern"] as? [String: String] else {
                throw SampleError("[Tokenizer] unsupported pre_tokenizer Sequence \(types) (expected Split(Isolated) then ByteLevel(use_regex: false, add_prefix_space: false))")
            }
            let regex = pattern["Regex"] ?? pattern["String"].map(NSRegularExpression.escapedPattern(for:))
            return try PreTokenizer(pattern: regex, addPrefixSpace: false)
        default:
            throw SampleError("[Tokenizer] unsupported pre_tokenizer \(json["type"] ?? "?") (expected ByteLevel, or Split + ByteLevel)")
        }
    }
}
