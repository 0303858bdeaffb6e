"""Stage 1 learns from the reviews: linear breed heads on a frozen timm backbone.

- :mod:`~catreview.heads.features`: pooled pre-logit features of every photo, computed through
  the stage-1 DataLoader and cached on disk per backbone (model id + weights digest).
- :mod:`~catreview.heads.fit`: class-balanced multinomial logistic regression on standardised
  features (scikit-learn), folded into the timm classifier; out-of-fold probabilities.
- :mod:`~catreview.heads.versions`: version folders (a full timm checkpoint + out-of-fold
  probabilities), rows of the ``adapters`` table with ``base_model = "stage1:<backbone key>"``,
  promote / rollback / "no version".
- :mod:`~catreview.heads.refit`: one refit from the current reviews, gated on the held-out test
  split like adapter rounds (:func:`catreview.adapters.gate.gate`).
"""
