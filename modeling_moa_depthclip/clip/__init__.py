"""Reading CLIP checkpoints in their published forms and initialising MoA-DepthCLIP from them."""
