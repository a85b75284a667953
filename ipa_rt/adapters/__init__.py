"""IP-Adapters as files and weights: reading checkpoints in their published layouts (``checkpoint``), the variant
table (``variants``), the adapter weights that install into a UNet and restore it (``stack``), decoupled attention
and the per-request image state (``attention``), image-prompt conditions and their encoding (``conditions``,
``image``), and scales (``scale``)."""
