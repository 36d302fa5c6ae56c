"""python -m fmvae.tools.gpu_check"""
from fmvae.tools.gpu_check.cli import main

if __name__ == "__main__":
    main()
