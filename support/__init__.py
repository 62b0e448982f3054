"""Support code a student may skip: fused and exact fast twins, run folders and checkpoint files, Hub and tokenizer I/O, the terminal and HTML views."""
