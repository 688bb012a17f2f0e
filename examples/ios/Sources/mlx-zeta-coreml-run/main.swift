// mlx-zeta-coreml-run: generate with a decoder package exported by `mlx-zeta export-coreml`.
//
//     mlx-zeta-coreml-run MODEL.mlpackage (--prompt TEXT | --prompt-ids 1,2,3) [--tokenizer DIR]
//         [--max-tokens N] [--temperature T] [--top-p P] [--seed S] [--compute-units cpu|gpu|ane|all]
//
// Prints `prompt ids: ...` and `ids: ...` (the generated ids, comma-separated, an end token
// included when drawn) and `text: "..."` (the generated text without special tokens, as a JSON
// string so it stays on one line). The tokenizer folder defaults to the one `--copy-tokenizer`
// writes beside the package (`model.mlpackage` -> `model.tokenizer/`).
import Foundation
import MLXZetaCoreML
#if canImport(CoreML)
import CoreML
#endif

/// The command line, parsed.
struct Options {
    var package: URL
    var tokenizer: URL?
    var prompt: String?
    var promptIDs: [Int]?
    var maxTokens = 64
    var temperature: Float = 0
    var topP: Float = 1
    var seed: UInt64 = 0
    var computeUnits = "all"

    static let usage = """
        usage: mlx-zeta-coreml-run MODEL.mlpackage (--prompt TEXT | --prompt-ids 1,2,3) [--tokenizer DIR]
               [--max-tokens N] [--temperature T] [--top-p P] [--seed S] [--compute-units cpu|gpu|ane|all]
        """

    /// Parses `arguments` (without the program name).
    init(_ arguments: [String]) throws {
        var rest = arguments[...]
        var package: String?
        func value(_ flag: String) throws -> String {
            guard let next = rest.popFirst() else { throw SampleError("\(flag) needs a value\n\(Options.usage)") }
            return next
        }
        func number<T: LosslessStringConvertible>(_ flag: String, _ type: T.Type) throws -> T {
            let text = try value(flag)
            guard let parsed = T(text) else { throw SampleError("expected \(flag) to be a number, got \(text)") }
            return parsed
        }
        var parsed: (tokenizer: String?, prompt: String?, ids: String?) = (nil, nil, nil)
        while let arg = rest.popFirst() {
            switch arg {
            case "--tokenizer": parsed.tokenizer = try value(arg)
            case "--prompt": parsed.prompt = try value(arg)
            case "--prompt-ids": parsed.ids = try value(arg)
            case "--max-tokens": maxTokens = try number(arg, Int.self)
            case "--temperature": temperature = try number(arg, Float.self)
            case "--top-p": topP = try number(arg, Float.self)
            case "--seed": seed = try number(arg, UInt64.self)
            case "--compute-units": computeUnits = try value(arg)
            case "-h", "--help": throw SampleError(Options.usage)
            default:
                guard package == nil, !arg.hasPrefix("-") else { throw SampleError("unexpected argument \(arg)\n\(Options.usage)") }
                package = arg
            }
        }
        guard let package else { throw SampleError("expected a package path\n\(Options.usage)") }
        guard (parsed.prompt == nil) != (parsed.ids == nil) else {
            throw SampleError("expected exactly one of --prompt and --prompt-ids\n\(Options.usage)")
        }
        guard maxTokens >= 1 else { throw SampleError("expected --max-tokens >= 1, got \(maxTokens)") }
        self.package = URL(fileURLWithPath: package)
        self.prompt = parsed.prompt
        self.promptIDs = try parsed.ids.map { text in
            try text.split(separator: ",").map { item in
                guard let id = Int(item.trimmingCharacters(in: .whitespaces)) else {
                    throw SampleError("expected --prompt-ids as comma-separated integers, got \(text)")
                }
                return id
            }
        }
        // Default tokenizer folder: what `mlx-zeta export-coreml --copy-tokenizer` writes beside the package.
        let beside = self.package.deletingPathExtension().appendingPathExtension(String(Contract.tokenizerFolderSuffix.dropFirst()))
        self.tokenizer = parsed.tokenizer.map { URL(fileURLWithPath: $0) }
            ?? (FileManager.default.fileExists(atPath: beside.path) ? beside : nil)
    }
}

/// A JSON string literal of `text` (one line, any character escaped as JSON needs).
func jsonString(_ text: String) -> String {
    let data = try? JSONSerialization.data(withJSONObject: [text], options: [.fragmentsAllowed])
    let array = data.flatMap { String(data: $0, encoding: .utf8) } ?? "[\"\"]"
    return String(array.dropFirst().dropLast())
}

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("mlx-zeta-coreml-run: \(message)\n".utf8))
    exit(2)
}

#if canImport(CoreML)
do {
    let options = try Options(Array(CommandLine.arguments.dropFirst()))
    let units: [String: MLComputeUnits] = ["cpu": .cpuOnly, "gpu": .cpuAndGPU, "ane": .cpuAndNeuralEngine, "all": .all]
    guard let computeUnits = units[options.computeUnits] else {
        fail("expected --compute-units cpu, gpu, ane or all, got \(options.computeUnits)")
    }
    let tokenizer = try options.tokenizer.map { try Tokenizer(folder: $0) }
    var promptIDs = options.promptIDs ?? []
    if let prompt = options.prompt {
        guard let tokenizer else { fail("--prompt needs a tokenizer: pass --tokenizer DIR (a folder with tokenizer.json)") }
        promptIDs = try tokenizer.encode(prompt)
    }
    let sampling = try Sampling.make(temperature: options.temperature, topP: options.topP)
    let generator = try await Generator.load(package: options.package, computeUnits: computeUnits)
    let ids = try generator.generate(prompt: promptIDs, maxTokens: options.maxTokens, sampling: sampling, seed: options.seed)
    print("prompt ids: " + promptIDs.map(String.init).joined(separator: ","))
    print("ids: " + ids.map(String.init).joined(separator: ","))
    if let tokenizer {
        print("text: " + jsonString(tokenizer.decode(ids.filter { !generator.info.eosTokenIDs.contains($0) })))
    }
} catch {
    fail("\(error)")
}
#else
fail("needs Core ML (macOS 15 / iOS 18); this platform has no CoreML module")
#endif
