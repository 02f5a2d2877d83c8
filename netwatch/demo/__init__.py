"""``netwatch demo`` and the population-database simulator it shares with the tests.

- ``simulator``: the simulated upstream API (``python -m netwatch.demo.simulator``);
- ``stations``: simulated ID-card stations sending numbered applications;
- ``run``: a whole site on loopback with a working day compressed into a minute.
"""
