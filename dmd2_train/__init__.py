"""dmd2_train: distil a diffusion teacher into a few-step generator with the DMD2 recipe.

Entry point: ``python -m dmd2_train`` (see ``__main__``); the loop is ``dmd2_train.loop.distill``.
"""
