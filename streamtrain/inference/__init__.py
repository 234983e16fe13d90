"""Using what a run trained: evaluating a checkpoint, exporting it, loading an export, asking a VLM.

``streamtrain eval`` / ``export`` / ``ask`` are built from these modules; ``load_encoder`` and
``load_vlm`` (re-exported as ``streamtrain.load_encoder`` / ``streamtrain.load_vlm``) read exports.
"""
