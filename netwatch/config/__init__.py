"""Configuration, parsed once at the edge: YAML -> pydantic schema -> frozen settings.

- ``yamlpos``: YAML -> plain data with the file line of every key path, ``${ENV}`` expansion;
- ``units``: durations, sizes, rates, times of day, day names;
- ``schema``: the models, cross-field checks and ``load_config(path)``;
- ``errors``: pydantic errors -> one located line each (``FILE:LINE: key.path: message``);
- ``files``: the files a config names (CA, certificates, queue key and directory), checked
  by ``check-config`` and at start with the same located lines.
"""
