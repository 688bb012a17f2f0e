import Foundation

/// A small seeded random number generator (SplitMix64), so a sampled run can be repeated.
/// Its draws are not MLX's: sampled tokens match MLX's only in distribution, greedy ones exactly.
public struct SeededGenerator: RandomNumberGenerator {
    private var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// How the next token is drawn from a row of logits.
public enum Sampling: Equatable {
    /// The most likely token (the first of equal maxima, as MLX's and numpy's `argmax`).
    case greedy
    /// Nucleus sampling: softmax of `logits / temperature`, keep the most likely tokens whose
    /// probabilities add up to `topP` (at least one), renormalise and draw.
    case topP(temperature: Float, topP: Float)

    /// `greedy` for temperature 0, else `topP`.
    ///
    /// - Throws: `SampleError` for a negative or non-finite temperature or a `topP` outside (0, 1].
    public static func make(temperature: Float, topP: Float = 1) throws -> Sampling {
        guard temperature.isFinite, temperature >= 0 else {
            throw SampleError("[Sampling] expected temperature >= 0, got \(temperature)")
        }
        guard topP > 0, topP <= 1 else {
            throw SampleError("[Sampling] expected top-p in (0, 1], got \(topP)")
        }
        return temperature == 0 ? .greedy : .topP(temperature: temperature, topP: topP)
    }

    /// The next token id for one row of `logits` (vocab,), drawing from `rng` when sampling.
    public func next<R: RandomNumberGenerator>(_ logits: [Float], using rng: inout R) -> Int {
        switch self {
        case .greedy:
            return argmax(logits)
        case let .topP(temperature, topP):
            return sampleTopP(logits, temperature: temperature, topP: topP, using: &rng)
        }
    }
}

/// Index of the largest value (the first one among equals); NaNs are never chosen.
public func argmax(_ values: [Float]) -> Int {
    var best = 0
    var bestValue = -Float.infinity
    for (i, v) in values.enumerated() where v > bestValue {
        best = i
        bestValue = v
    }
    return best
}

/// The probabilities `softmax(logits / temperature)`, computed stably (max subtracted first).
public func softmax(_ logits: [Float], temperature: Float = 1) -> [Float] {
    let top = logits.max() ?? 0
    var out = logits.map { Float(exp(Double(($0 - top) / temperature))) }
    let total = out.reduce(0, +)
    if total > 0 { out = out.map { $0 / total } }
    return out
}

/// Draw from the smallest set of most likely tokens whose probabilities add up to `topP`
/// (see `Sampling.topP`).
public func sampleTopP<R: RandomNumberGenerator>(_ logits: [Float], temperature: Float, topP: Float,
                                                 using rng: inout R) -> Int {
    let probs = softmax(logits, temperature: temperature)
    let order = probs.indices.sorted { probs[$0] > probs[$1] || (probs[$0] == probs[$1] && $0 < $1) }
    var kept: [Int] = []
    var mass: Float = 0
    for i in order {
        kept.append(i)
        mass += probs[i]
        if mass >= topP { break }
    }
    var u = Float.random(in: 0..<1, using: &rng) * mass
    for i in kept {
        u -= probs[i]
        if u < 0 { return i }
    }
    return kept.last ?? 0
}
