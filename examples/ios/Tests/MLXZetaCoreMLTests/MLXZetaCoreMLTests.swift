import Foundation
import XCTest

@testable import MLXZetaCoreML

/// The parts of the sample that need no Core ML: the choice of prefill functions, the metadata,
/// sampling, GPT-2's byte map and the BPE tokenizer (hand-computable cases; the tokenizer is also
/// compared with the `tokenizers` library by tests/test_swift_tokenizer.py in the mlx-zeta repo).
final class MLXZetaCoreMLTests: XCTestCase {
    func testPrefillPlanFollowsTheChoiceOfFunction() throws {
        let plan = { (n: Int, start: Int) in try prefillPlan(tokens: n, start: start, lengths: [16, 8], capacity: 64) }
        // 23 tokens: no length holds them, so the largest (16) on 16 tokens, then 7 left -> prefill_8, padded.
        XCTAssertEqual(try plan(23, 0), [PrefillCall(length: 16, count: 16, position: 0),
                                         PrefillCall(length: 8, count: 7, position: 16)])
        XCTAssertEqual(try plan(5, 0), [PrefillCall(length: 8, count: 5, position: 0)])
        XCTAssertEqual(try plan(9, 3).map(\.function), ["prefill_16"])
        XCTAssertThrowsError(try plan(5, 60))  // prefill_8 at 60 would write slots 60..<68 > 64
        XCTAssertThrowsError(try plan(0, 0))
    }

    func testPackageInfoReadsTheMetadata() throws {
        let info = try PackageInfo(metadata: [
            MetadataKey.task: "causal-lm", MetadataKey.capacity: "64", MetadataKey.prefillLengths: "[16, 8]",
            MetadataKey.vocabSize: "300", MetadataKey.eosTokenIDs: "[0, 2]", MetadataKey.padTokenID: "null",
            MetadataKey.bosTokenID: "1", MetadataKey.tokenizerFiles: "[\"tokenizer.json\"]",
        ])
        XCTAssertEqual(info, PackageInfo(capacity: 64, prefillLengths: [8, 16], vocabSize: 300, bosTokenID: 1,
                                         eosTokenIDs: [0, 2], padTokenID: 0, tokenizerFiles: ["tokenizer.json"]))
        XCTAssertThrowsError(try PackageInfo(metadata: [MetadataKey.prefillLengths: "[8]", MetadataKey.vocabSize: "3"]))
        XCTAssertThrowsError(try PackageInfo(metadata: [MetadataKey.task: "function", MetadataKey.capacity: "8",
                                                        MetadataKey.prefillLengths: "[8]", MetadataKey.vocabSize: "3"]))
        XCTAssertThrowsError(try PackageInfo(metadata: [MetadataKey.capacity: "8", MetadataKey.prefillLengths: "[16]",
                                                        MetadataKey.vocabSize: "3"]))  // 16 > capacity
        XCTAssertEqual(PackageInfo.keyCache(3), "k_cache_3")
    }

    func testSampling() throws {
        XCTAssertEqual(argmax([1, 3, 3, -2]), 1)  // the first of equal maxima
        XCTAssertEqual(try Sampling.make(temperature: 0), .greedy)
        XCTAssertThrowsError(try Sampling.make(temperature: 1, topP: 0))
        var rng = SeededGenerator(seed: 7)
        let logits: [Float] = [0, 5, 1, 4.9]
        // top-p 0.1 keeps only the most likely token, whatever is drawn
        XCTAssertEqual((0..<20).map { _ in sampleTopP(logits, temperature: 1, topP: 0.1, using: &rng) }, Array(repeating: 1, count: 20))
        var a = SeededGenerator(seed: 3), b = SeededGenerator(seed: 3)
        let sampling = try Sampling.make(temperature: 1, topP: 0.95)
        XCTAssertEqual((0..<50).map { _ in sampling.next(logits, using: &a) }, (0..<50).map { _ in sampling.next(logits, using: &b) })
        let probs = softmax([0, Float(log(3.0))])
        XCTAssertEqual(probs[0], 0.25, accuracy: 1e-6)  // 1 / (1 + 3)
    }

    func testByteMap() {
        XCTAssertEqual(ByteLevel.byteToScalar[32], "Ġ")  // space: the 33rd byte without a printable self (256 + 32)
        XCTAssertEqual(ByteLevel.byteToScalar[10], "Ċ")
        XCTAssertEqual(ByteLevel.byteToScalar[65], "A")
        XCTAssertEqual(Set(ByteLevel.byteToScalar).count, 256)
        let text = "héllo 世界 🚀\n"
        XCTAssertEqual(String(decoding: ByteLevel.bytes(of: String(String.UnicodeScalarView(ByteLevel.encode(text)))), as: UTF8.self), text)
    }

    func testTokenizer() throws {
        let json = """
            {"model": {"type": "BPE", "vocab": {"h": 0, "i": 1, "\\u0120": 2, "hi": 3, "\\u0120hi": 4, "!": 5},
                       "merges": ["h i", ["\\u0120", "hi"]]},
             "added_tokens": [{"id": 6, "content": "<eos>", "special": true}],
             "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false}}
            """
        let tokenizer = try Tokenizer(json: Data(json.utf8))
        // "hi" "Ġhi" "!" then the added token: h+i -> hi (rank 0), Ġ+hi -> Ġhi (rank 1)
        XCTAssertEqual(try tokenizer.encode("hi hi!<eos>"), [3, 4, 5, 6])
        XCTAssertEqual(tokenizer.decode([3, 4, 5, 6]), "hi hi!")
        XCTAssertEqual(tokenizer.decode([3, 6], skipSpecialTokens: false), "hi<eos>")
        XCTAssertThrowsError(try tokenizer.encode("x"))  // no such symbol, no unk_token
    }
}
