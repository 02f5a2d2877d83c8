"""Configuration, parsed once at the edge: YAML -> pydantic schema -> frozen settings.

- ``yamlpos``: YAML -> plain data with the file line of every key path, ``${ENV}`` expansion;
- ``units``: durations, sizes, rates, times of day, day names;
- ``schema``: the models, cross-field checks and ``load_config(path)``;
- ``errors``: pydantic errors -> one located line each (``FILE:LINE: key.path: message``).
"""
