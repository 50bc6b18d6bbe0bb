"""Evaluating music, whoever made it: statistics of performances against a reference.

==========  =====================================================================================
``stats``   note features as fixed-bin histograms, overlap area and KL between two sets
``midi``    reading folders of MIDI files (unreadable files skipped, one line each), the
            reference (MAESTRO test, or the shipped statistics), the result table
``report``  report.md with the side-by-side table and PNG figures per set plus one comparison
``cli``     ``cadenza eval midi DIR... [--reference DIR|FILE.json] [--report OUT_DIR] [--json]``
==========  =====================================================================================
"""
