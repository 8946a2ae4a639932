"""`gravprobe run`: generate -> pretrain (per attention variant) -> probe -> report. (issue 6)"""
