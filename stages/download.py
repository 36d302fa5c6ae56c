"""Stage download: fetch the data set (mirror or canonical address) into compact tensors."""
from _common import DATA, main

from fmvae.data.prepared import prepare_data

if __name__ == "__main__":
    main(lambda params: prepare_data(params, DATA))
