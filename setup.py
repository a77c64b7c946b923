"""The package layout pyproject.toml cannot state: the zoo ships inside the workbench package.

The repository keeps the zoo's weights, tokenizers and training records in data/zoo/ (where
`workbench zoo train` writes them); a built wheel carries them as the package
`workbench.zoo_data`, so an installed copy finds its models without the source tree.
workbench.models.zoo looks in both places.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["workbench*", "sae*", "app*"]) + ["workbench.zoo_data"],
    package_dir={"workbench.zoo_data": "data/zoo"},
    package_data={"workbench.zoo_data": ["*/*"]},
)
