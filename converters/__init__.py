"""Export targets: one package per target (tf, tff, stablehlo, tflite) plus runtimes."""
