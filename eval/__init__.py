"""Evaluation metrics computed from features, and the HTML report (docs/architecture.md).

- ``eval.features``: swappable feature extractors (standard FID InceptionV3, any transformers
  image encoder, a built-in fallback whose numbers are NOT comparable with published FIDs);
- ``eval.distances``: Fréchet distance (FID / FBD), KID, Inception Score, on features;
- ``eval.diversity``: mean pairwise SSIM / MS-SSIM within a prompt;
- ``eval.fundus_stats``: fundus image statistics (SNR, contrast, sharpness, vessels, lighting);
- ``eval.prompt_metrics``: Prompt-to-Polyp Fidelity / Agreement / Diversity / FBD;
- ``eval.privacy``: nearest-training-image distances and near-copy flags;
- ``eval.utility``: train-on-synthetic classifier utility and generation accuracy;
- ``eval.evaluate``: ``medrl eval``, a loop over the metric objects of ``eval.metrics`` and
  ``eval.image_metrics`` (``update`` per chunk of decoded images, ``compute`` per section),
  on the images ``eval.samples`` finds; ``eval.report``: the HTML page.

Definitions, units and caveats: docs/metrics.md.
"""
