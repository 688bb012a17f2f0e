// A command for tests/test_swift_tokenizer.py (mlx-zeta repo): compiled there together with the
// library's pure-Swift files (no Core ML, so it builds on Linux too), not part of the package.
//
//     tokenizer_parity TOKENIZER_DIR CASES.json
//
// CASES.json: {"texts": [String], "ids": [[Int]]}. Prints {"encode": [[Int]], "decode": [String]}:
// `Tokenizer.encode` of each text and `Tokenizer.decode` of each id list, as JSON on stdout.
import Foundation

let arguments = CommandLine.arguments
guard arguments.count == 3, let data = FileManager.default.contents(atPath: arguments[2]),
      let cases = try JSONSerialization.jsonObject(with: data) as? [String: Any],
      let texts = cases["texts"] as? [String], let idLists = cases["ids"] as? [[Int]] else {
    FileHandle.standardError.write(Data("usage: tokenizer_parity TOKENIZER_DIR CASES.json\n".utf8))
    exit(2)
}
let tokenizer = try Tokenizer(folder: URL(fileURLWithPath: arguments[1]))
let encoded = try texts.map { try tokenizer.encode($0) }
let decoded = idLists.map { tokenizer.decode($0) }
FileHandle.standardOutput.write(try JSONSerialization.data(withJSONObject: ["encode": encoded, "decode": decoded]))
