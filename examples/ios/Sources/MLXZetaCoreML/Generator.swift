#if canImport(CoreML)
import CoreML
import Foundation

/// Drives a decoder package exported by `mlx-zeta export-coreml` (see `Contract`): one `MLModel`
/// per function of the package (`MLModelConfiguration.functionName`), all sharing ONE `MLState`
/// (the KV cache), the prompt through `prefill_{L}` calls, then `decode` one token at a time.
///
/// ```swift
/// let generator = try await Generator.load(package: url, computeUnits: .cpuOnly)
/// let ids = try generator.generate(prompt: promptIDs, maxTokens: 64, sampling: .greedy)
/// ```
///
/// The state is created once from the `decode` model (`makeState()`) and handed to every
/// prediction, prefill and decode alike: the functions of one package declare the same states, and
/// Core ML lets a state made by one function's model serve another function of the same asset.
/// Predictions are synchronous and must not overlap (they share the state): call from one task.
public final class Generator {
    /// What the package's metadata says (capacity, prefill lengths, vocabulary, end tokens).
    public let info: PackageInfo
    /// Cache index where the next token will be written (tokens held in the state so far).
    public private(set) var position = 0

    private let decodeModel: MLModel
    private let prefillModels: [Int: MLModel]
    private var state: MLState

    private init(info: PackageInfo, decodeModel: MLModel, prefillModels: [Int: MLModel]) {
        self.info = info
        self.decodeModel = decodeModel
        self.prefillModels = prefillModels
        self.state = decodeModel.makeState()
    }

    /// Loads the package at `url` (an `.mlpackage`, compiled here, or an already compiled
    /// `.mlmodelc`), one model per function, and checks every name, shape and data type the
    /// sample relies on against the models' descriptions.
    ///
    /// - Throws: Core ML's errors, or `SampleError` naming the function and feature that does not
    ///   match the contract or the metadata.
    public static func load(package url: URL, computeUnits: MLComputeUnits = .all) async throws -> Generator {
        let compiled: URL
        if url.pathExtension == "mlmodelc" {
            compiled = url
        } else {
            compiled = try await MLModel.compileModel(at: url)  // into a temporary folder
        }
        func model(_ function: String) throws -> MLModel {
            let configuration = MLModelConfiguration()
            configuration.computeUnits = computeUnits
            configuration.functionName = function
            return try MLModel(contentsOf: compiled, configuration: configuration)
        }
        let decode = try model(Contract.decodeFunction)
        let metadata = decode.modelDescription.metadata[MLModelMetadataKey.creatorDefinedKey] as? [String: String] ?? [:]
        let info = try PackageInfo(metadata: metadata)
        var prefill: [Int: MLModel] = [:]
        for length in info.prefillLengths {
            prefill[length] = try model(PackageInfo.prefillFunction(length))
        }
        try check(decode, function: Contract.decodeFunction, length: 1, info: info)
        for (length, m) in prefill {
            try check(m, function: PackageInfo.prefillFunction(length), length: length, info: info)
        }
        return Generator(info: info, decodeModel: decode, prefillModels: prefill)
    }

    /// Forgets the cache: a fresh state (zeros) and position 0.
    public func reset() {
        state = decodeModel.makeState()
        position = 0
    }

    /// Writes `ids` into the cache from `position` by the package's choice of prefill functions
    /// (`prefillPlan`); returns the logits (vocab,) that follow the last of them.
    public func prefill(_ ids: [Int]) throws -> [Float] {
        try checkIDs(ids)
        var last: [Float] = []
        for call in try prefillPlan(tokens: ids.count, start: position, lengths: info.prefillLengths,
                                    capacity: info.capacity) {
            let offset = call.position - position
            var chunk = ids[offset..<offset + call.count].map { Int32($0) }
            chunk += Array(repeating: Int32(info.padTokenID), count: call.length - call.count)  // right padding
            let logits = try run(prefillModels[call.length]!, function: call.function, ids: chunk, at: call.position)
            last = try Generator.row(logits, call.count - 1, function: call.function)
        }
        position += ids.count
        return last
    }

    /// Writes one token at `position` with `decode`; returns the logits (vocab,) that follow it.
    public func decode(_ id: Int) throws -> [Float] {
        try checkIDs([id])
        guard position + 1 <= info.capacity else {
            throw SampleError("[Generator] the cache is full (capacity \(info.capacity)); reset() to start again")
        }
        let logits = try run(decodeModel, function: Contract.decodeFunction, ids: [Int32(id)], at: position)
        position += 1
        return try Generator.row(logits, 0, function: Contract.decodeFunction)
    }

    /// Generates after `prompt` (from an empty cache): prefill, then one token per `decode` call,
    /// until an end token is drawn (it is the last id returned), `maxTokens` ids are drawn, or the
    /// cache is full. `onToken` sees each id as it is drawn.
    public func generate(prompt: [Int], maxTokens: Int, sampling: Sampling = .greedy, seed: UInt64 = 0,
                         onToken: (Int) -> Void = { _ in }) throws -> [Int] {
        reset()
        var rng = SeededGenerator(seed: seed)
        var logits = try prefill(prompt)
        var out: [Int] = []
        while out.count < maxTokens {
            let token = sampling.next(logits, using: &rng)
            out.append(token)
            onToken(token)
            if info.eosTokenIDs.contains(token) || out.count == maxTokens || position + 1 > info.capacity { break }
            logits = try decode(token)
        }
        return out
    }

    // MARK: - one prediction

    private func run(_ model: MLModel, function: String, ids: [Int32], at position: Int) throws -> MLMultiArray {
        let inputIDs = MLMultiArray(MLShapedArray<Int32>(scalars: ids, shape: [Contract.batch, ids.count]))
        let positionArray = MLMultiArray(MLShapedArray<Int32>(scalars: [Int32(position)], shape: [1]))
        let features = try MLDictionaryFeatureProvider(dictionary: [
            Contract.inputIDs: MLFeatureValue(multiArray: inputIDs),
            Contract.position: MLFeatureValue(multiArray: positionArray),
        ])
        let output = try model.prediction(from: features, using: state, options: MLPredictionOptions())
        guard let logits = output.featureValue(for: Contract.logits)?.multiArrayValue else {
            throw SampleError("[Generator] \(function) returned no multi-array \(Contract.logits)")
        }
        return logits
    }

    /// Row `index` of logits (B, T, vocab), batch row 0, as floats (any stride or float type).
    private static func row(_ logits: MLMultiArray, _ index: Int, function: String) throws -> [Float] {
        let shaped = MLShapedArray<Float>(converting: logits)
        let shape = shaped.shape
        guard shape.count == 3, index < shape[1] else {
            throw SampleError("[Generator] expected \(function)'s \(Contract.logits) to be (B, T, vocab) with T > \(index), got \(shape)")
        }
        let start = index * shape[2]
        return Array(shaped.scalars[start..<start + shape[2]])
    }

    private func checkIDs(_ ids: [Int]) throws {
        if let bad = ids.first(where: { $0 < 0 || $0 >= info.vocabSize }) {
            throw SampleError("[Generator] expected token ids in 0..<\(info.vocabSize), got \(bad)")
        }
    }

    // MARK: - the contract, checked against a loaded function

    /// The Core ML data type a `Contract` data-type name stands for.
    static func dataType(_ name: String) -> MLMultiArrayDataType? {
        switch name {
        case "int32": return .int32
        case "float16": return .float16
        case "float32": return .float32
        case "float64": return .float64
        default: return nil
        }
    }

    private static func check(_ model: MLModel, function: String, length: Int, info: PackageInfo) throws {
        let description = model.modelDescription
        func fail(_ what: String) -> SampleError { SampleError("[Generator] function \(function): \(what)") }
        func input(_ name: String, shape: [Int], type: String) throws {
            guard let c = description.inputDescriptionsByName[name]?.multiArrayConstraint else {
                throw fail("has no multi-array input \(name)")
            }
            guard c.shape.map(\.intValue) == shape, c.dataType == dataType(type) else {
                throw fail("expected input \(name) \(type) \(shape), got shape \(c.shape) (data type raw value \(c.dataType.rawValue))")
            }
        }
        try input(Contract.inputIDs, shape: [Contract.batch, length], type: Contract.inputIDsDataType)
        try input(Contract.position, shape: [1], type: Contract.positionDataType)
        guard let logits = description.outputDescriptionsByName[Contract.logits]?.multiArrayConstraint,
              logits.dataType == dataType(Contract.logitsDataType) else {
            throw fail("expected a \(Contract.logitsDataType) multi-array output \(Contract.logits)")
        }
        let states = description.stateDescriptionsByName
        let layers = states.keys.filter { $0.hasPrefix(Contract.keyCachePrefix) }.count
        guard layers > 0, states.count == 2 * layers else {
            throw fail("expected states \(Contract.keyCachePrefix)i and \(Contract.valueCachePrefix)i, got \(states.keys.sorted())")
        }
        for layer in 0..<layers {
            for name in [PackageInfo.keyCache(layer), PackageInfo.valueCache(layer)] {
                let c = states[name]?.stateConstraint
                let shape = c?.bufferShape.map { ($0 as NSNumber).intValue } ?? []
                guard let c, c.dataType == dataType(Contract.stateDataType), shape.count > Contract.stateCapacityAxis,
                      shape[Contract.stateCapacityAxis] == info.capacity else {
                    throw fail("expected state \(name) \(Contract.stateDataType) with capacity \(info.capacity) on axis \(Contract.stateCapacityAxis)")
                }
            }
        }
    }
}
#endif
