"""The top floor: the CLI, quickstart, training and the parity harness. Imports every floor below."""
