"""The training core: the loop, the method and add-on contracts, optimizers, distributed helpers,
evaluation, backbones, checkpoints and pre-emption. It knows no job runner, store layout or paper."""
