"""One module per CLI command: parse options, call the library, print. Heavy imports
(torch, vllm, transformers) happen inside the command functions so `--help` is instant."""
