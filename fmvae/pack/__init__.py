"""Packed trials: several models of one network shape trained as one, along a leading member axis.

A pack holds M FMVAEs that share arch, x_shape, I, D and channels and differ in K (and seed). Their
network weights are stacked (torch.func.stack_module_state), each member's prior is padded to the
pack's largest K with its own mask (a padded component has E[log pi] = -inf, so it never takes
responsibility, SVI leaves it at the hyperprior, and every bound term ignores it), and the model's
own methods run per member under torch.func.vmap + functional_call. PackedModel offers the FMVAE
interface the training steps use (encode, vae_bound, bound_from_encodings, prior.stats / svi_step /
svi_steps, network_parameters, state_dict), so fmvae.core.phases's step functions train a pack unchanged:
their losses are per-member means summed over members, so each member's gradient, Adam step
(elementwise), weight average and SVI step are its own.

Each member keeps its own random stream for the reparameterisation noise, seeded as a trial
alone seeds the global one, so a member draws exactly the noise it would draw alone.

    model.py        PackedModel and PackedPrior (vmapped members), PackBatcher (each member's random stream)
    checkpoints.py  one checkpoint folder per member
    memory.py       the largest pack the GPU's free memory holds, checked before training
    train.py        train_pack
"""
