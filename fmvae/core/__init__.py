"""What trains and evaluates: the model, its prior and the phases (these files are the code digest, fmvae.provenance)."""
