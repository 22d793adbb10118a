"""Inference tooling built on the model core: depth for whole datasets (`dataset_prediction`)."""
