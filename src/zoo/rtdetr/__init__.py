"""RT-DETRv2 and DSET on it. Importing registers the components (backbone-free detector parts, matcher,
criteria, postprocessor), the ``dset:`` config section, the DSET training hook and the weight adapters."""
from src.zoo.rtdetr import (hybrid_encoder, rtdetrv2_decoder, rtdetr, matcher, rtdetrv2_criterion,  # noqa: F401
                            rtdetr_postprocessor, dset_config, dset_encoder, dset_decoder, dset_model,
                            dset_criterion, dset_hooks, weights)
