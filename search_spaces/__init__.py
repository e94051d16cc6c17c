"""The drop-in folder of search spaces: every public module here registers its spaces on import.

The contract and the registry live in :mod:`dynas.spaces`; ``dynas.spaces.list_spaces()`` imports
this folder's modules on first use. A new space is one file here (or an installed package's
``dynas.search_spaces`` entry point)::

    from dynas.spaces import Candidate, Choice, SearchSpace, register_space

    @register_space
    class MySpace(SearchSpace):
        name = "my_space"
        ...
"""
