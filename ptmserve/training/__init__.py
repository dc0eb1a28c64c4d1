"""Early-exit training on a frozen backbone (``ptmserve train-exits``, docs/early-exit.md).

- ``data``: the labelled CSV and its stratified split;
- ``features``: each candidate layer's pooled features, computed once over the data;
- ``heads``: a linear classifier per layer (and the final one when the base model has no head);
- ``thresholds``: per-exit thresholds that keep the cascade within a tolerance of the final classifier;
- ``timing``: the inference-time matrix, measured with the real encoder;
- ``placement``: the batching-pattern matrix and the choice of exits (PAME);
- ``train``: the whole run, then the new model stored next to its base, sharing its bytes;
- ``datasets``: public datasets shipped in packages, written as CSV files.
"""
