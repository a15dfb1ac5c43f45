"""The rating workbench: experts rate a round's images in a browser (``medrl ratings serve``).

:mod:`rewards.workbench.store` keeps raters, their queues and every answer in the ratings
store (one SQLite transaction per answer, WAL), in the tables of
:mod:`rewards.workbench.tables`; :mod:`rewards.workbench.protocol` is what a rater is asked
and which answers are taken; :mod:`rewards.workbench.queues` orders each rater's queue and
measures self-agreement; :mod:`rewards.workbench.app` is the FastAPI application that
serves the pages. docs/rating.md is the guide.
"""
