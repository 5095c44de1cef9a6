"""The config files that ship with jaxtrain, installed as the package `jaxtrain.configs`.

`jaxtrain.load_config("gpt_pysource.py:smoke")` and `jaxtrain train
--config=gpt_pysource.py` find them by name from any install; a path works too. A config
of your own can start from the shared fields: `from jaxtrain.configs import base`.
"""
