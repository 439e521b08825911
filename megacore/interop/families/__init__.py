"""One module per Hugging Face model family. Each module defines ``ADAPTER`` (a
``megacore.interop.adapter.FamilyAdapter``) holding the family's defaults, its config.json <->
megacore config mapping, its weight-name rules, its export checks and its activation names.
``megacore.interop.registry`` finds them by listing this package: adding a family is adding a
file here. Modules here import only the shared mapping helpers (``megacore.interop.adapter``,
``hf_weights``, ``hf_activations``, ``hf_rope``) and each other, never the registry or the entry
points (``hf``, ``hf_config``, ``hf_llava``)."""
