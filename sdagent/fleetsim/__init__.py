"""The fleet simulator: the shipped fleet at full scale, second by second (SimPy).

Reads the scaling policy from the CloudFormation templates themselves (``fleet/fleet.yaml``,
``cloudwatch/alarms.yaml``), so that it and the templates cannot disagree unnoticed.
"""
