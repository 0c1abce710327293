"""patch()'s knowledge of transformers' models: the families (families.py, data) and the
forwards bound to their modules (forwards.py, code written once for all of them)."""
