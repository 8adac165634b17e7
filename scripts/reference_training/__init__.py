"""Training of the embedded reference models, one module per stage (``scripts/train_reference.py`` is the
command line): ``common`` (paths, device, records), ``loader`` (batch workers), ``vae``, ``text``, ``denoiser``."""
