"""The component atlas (work in progress): what each component of a store does.

:mod:`~vitdecomp.explore.summary` precomputes, in two streaming passes over a finished store, each
component's share, principal directions and the items at both ends of each direction, keyed to the
store's identity. The web explorer and the static atlas will read it.
"""
