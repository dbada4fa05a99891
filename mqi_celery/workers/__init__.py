"""The Celery side: one thin task module per queue, each task unpacking its arguments,
calling the domain function with this process's ``Context`` and mapping the outcome to
Celery (retry, ignore, next signature). Nothing outside this package and ``celery_app``
imports Celery; the domain reaches the broker through ``Context.sender`` (``sending``).

    scan        scanner        mqi.scan_inbox
    conductor   conductor      mqi.admit_case, verify_results, finalize_case, stop_case, retry_case, cancel_case
    transfer    file_transfer  mqi.upload_case, mqi.download_results
    execute     remote_executor mqi.submit_beam
    control     poller, reconciler  mqi.poll_jobs, mqi.reconcile, mqi.resume_parked
    curator     curator        mqi.read_host, mqi.report_system_status
    qa          qa_evaluator   mqi.evaluate_case
"""
