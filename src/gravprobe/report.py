"""`gravprobe report`: rebuild report.md and plots of a run or sweep folder from its files alone. (issue 6)"""
