"""The fake servers the tests run sageplex_sync against, and their contract tests.

``fake_http`` (real HTTP on 127.0.0.1, request log, faults), ``fake_sagex`` (SageTV's
sagex API), ``fake_plex`` (a Plex Media Server for the unmodified plexapi) and ``world``
(declare items once, get both fakes agreeing about them).
"""
