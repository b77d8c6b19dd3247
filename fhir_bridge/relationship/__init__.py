"""The two-way relationship (issue 10): what the clinician and the patient share between visits.

One module per job, each writing its own table and queuing its FHIR resource through
:func:`fhir_bridge.delivery.outbox.put` in the caller's transaction (so the row, the audit event and
the EHR write commit together or not at all):

* :mod:`.consent`: the patient's consent to share app data with the care team (``Consent``), queued
  when a pairing code is claimed and set ``inactive`` when the enrollment ends;
* :mod:`.goals`: shared goals (``Goal``), with :mod:`.progress` for measurable targets;
* :mod:`.tasks`: tasks between visits (``Task``), completed when the matching data arrives;
* :mod:`.messages`: short messages both ways (``Communication``);
* :mod:`.access`: which patients a vendor may see (its active enrollments, nothing else);
* :mod:`.webhooks`: signed event delivery to the vendor.
"""
