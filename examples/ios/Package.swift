// swift-tools-version:5.9
// The Swift sample of mlx-zeta's Core ML export: a library that drives an exported decoder package
// (prefill + decode functions sharing one MLState) and a command-line runner. See README.md.
import PackageDescription

let package = Package(
    name: "MLXZetaCoreML",
    // Core ML states (MLState) and multifunction packages (MLModelConfiguration.functionName)
    // need iOS 18 / macOS 15. Written as strings so tools-version 5.9 manifests accept them.
    platforms: [.iOS("18.0"), .macOS("15.0")],
    products: [
        .library(name: "MLXZetaCoreML", targets: ["MLXZetaCoreML"]),
        .executable(name: "mlx-zeta-coreml-run", targets: ["mlx-zeta-coreml-run"]),
    ],
    targets: [
        .target(name: "MLXZetaCoreML"),
        .executableTarget(name: "mlx-zeta-coreml-run", dependencies: ["MLXZetaCoreML"]),
        .testTarget(name: "MLXZetaCoreMLTests", dependencies: ["MLXZetaCoreML"]),
    ]
)
