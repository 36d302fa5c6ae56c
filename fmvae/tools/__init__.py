"""The benchmark (python -m fmvae.tools.bench) and the GPU check (python -m fmvae.tools.gpu_check)."""
