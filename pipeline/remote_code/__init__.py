"""Remote-code files that tiny legacy checkpoints (MiniCPM-V <= 4.5) carry in their directory.

These generations load config, image processor and processor through `trust_remote_code` from
files next to the weights. `pipeline.tiny_legacy` copies the files of `minicpmv/` into the tiny
model directories it writes. They are our own implementation of the published behaviour (LLaVA-UHD
slicing, placeholders, image ids), small enough to read, and nothing in the pipeline imports them.
"""
