"""The ground floor: the architecture table, the bundle, the reference model, errors, tokenizers, outputs,
perplexity, RoPE, the verifier and the quantized-tensor formats that loaders read. Imports nothing above it."""
