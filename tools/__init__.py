"""Tools over the training core: `dedistill plan` (memory, FLOPs, comm of a config) and `dedistill prune` (FLUX ->
Chroma). They read the core (train/) and are not part of the trainer."""
