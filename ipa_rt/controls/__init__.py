"""Structure conditions beside the IP-Adapters: ControlNets (``controlnet``) and T2I-Adapters (``t2i``)."""
