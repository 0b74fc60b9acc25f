"""`semisparse export`: a run directory as a compact checkpoint (docs/export.md).

    options.py  the choices (format, dtype, quant, group size) and their checks; no torch, so the pipeline config
                validates them before anything heavy is imported
    pack.py     one sparse layer <-> kept values + bit-packed in-group positions (pure tensors)
    quant.py    weight-only symmetric quantization of the kept values: int8 per output channel, int4 group-wise;
                round to nearest (RTN), or codes chosen by gptq.py
    gptq.py     --quant-method gptq: kept values quantized column by column with SparseGPT's Hessian machinery,
                errors spread onto later columns, pruned entries left exactly 0
    source.py   read and check the run directory being exported
    packed.py   the packed tensors and per-layer records of a model
    hf.py       the stock transformers folder (optionally with SLoRB merged into the dense weights)
    gguf_writer.py  --format gguf: one llama.cpp file (llama models; Q8_0/Q4_0 through the gguf package)
    format.py   the manifest: write, read, verify (format version, sha256 of every file)
    writer.py   export_run(): checks, then one atomic folder write
    load.py     rebuild the transformers model from an exported folder
    cpu_backend.py  backend="cpu": an int8/int4 export's layers through torch's weight-only CPU kernels
    cuda_backend.py backend="semi-structured": 2:4 layers as torch.sparse.to_sparse_semi_structured weights (CUDA)

Modules are imported on use: ``import semisparse.export.options`` stays light.
"""
