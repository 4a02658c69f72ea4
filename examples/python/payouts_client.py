"""A partner-payouts client in Python: registers a partner, files its claim and reads the payout.

The stubs are generated from proto/ when the client starts (grpcio-tools), so the client always
speaks the protos of this checkout. Run it against a service:

    python payouts_client.py --target 127.0.0.1:50051 [--token TOKEN]

or let examples/python/run start one of its own on SQLite and run it. It exits non-zero, saying
why, if any step does not answer as the service promises.
"""

import argparse
import importlib
import pathlib
import random
import sys
import tempfile
import time
import uuid

import grpc
from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[2] / "proto"
PROTOS = [
    "google/rpc/status.proto",
    "payouts/v1/common.proto",
    "payouts/v1/partner.proto",
    "payouts/v1/claim.proto",
    "payouts/v1/disbursement.proto",
]


def generate_stubs(out_dir):
    """Generates the message and service modules of PROTOS into out_dir and imports them."""
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        sys.exit("generating the stubs from proto/ failed")
    sys.path.insert(0, str(out_dir))
    return {
        name: importlib.import_module(f"payouts.v1.{name}")
        for name in [
            "common_pb2",
            "partner_pb2",
            "partner_pb2_grpc",
            "claim_pb2",
            "claim_pb2_grpc",
            "disbursement_pb2",
            "disbursement_pb2_grpc",
        ]
    }


def business_registration_number():
    """A valid registration number (XXX-XX-XXXXX) with a random serial, so runs never collide."""
    digits = [random.randint(0, 9) for _ in range(9)]
    weights = [1, 3, 7, 1, 3, 7, 1, 3, 5]
    total = sum(d * w for d, w in zip(digits, weights)) + digits[8] * 5 // 10
    digits.append((10 - total % 10) % 10)
    text = "".join(map(str, digits))
    return f"{text[:3]}-{text[3:5]}-{text[5:]}"


def check(condition, message):
    if not condition:
        sys.exit(f"unexpected answer: {message}")


def run(pb, target, token):
    """Registers a partner, files its claim and reads its payout until it is paid."""
    common, partner_pb, claim_pb, disb_pb = (
        pb["common_pb2"],
        pb["partner_pb2"],
        pb["claim_pb2"],
        pb["disbursement_pb2"],
    )
    metadata = [("authorization", f"Bearer {token}")] if token else []

    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=30)
    partners = pb["partner_pb2_grpc"].PartnerServiceStub(channel)
    claims = pb["claim_pb2_grpc"].ClaimServiceStub(channel)
    disbursements = pb["disbursement_pb2_grpc"].DisbursementServiceStub(channel)

    # Every mutating call carries a request id of the caller's: sent again, it is answered
    # with the first result rather than done twice.
    register = partner_pb.RegisterPartnerRequest(
        request_id=str(uuid.uuid4()),
        partner=partner_pb.Partner(
            business_registration_number=business_registration_number(),
            legal_name="Haneul Bakery",
            representative_name="Kim Minji",
            affected_services=[common.AFFECTED_SERVICE_KAKAOTALK_CHANNEL],
            bank_account=partner_pb.BankAccount(
                bank_code="004", account_number="110-123-456789", holder_name="Kim Minji"
            ),
            contact_email="owner@haneul.example",
        ),
    )
    partner = partners.RegisterPartner(register, metadata=metadata, timeout=10).partner
    again = partners.RegisterPartner(register, metadata=metadata, timeout=10).partner
    check(partner.partner_id, "RegisterPartner gave no partner_id")
    check(again.partner_id == partner.partner_id, "a repeated request_id registered again")
    check(
        partner.bank_account.account_number == "****6789",
        f"the account number is not masked: {partner.bank_account.account_number!r}",
    )
    print(f"registered partner {partner.partner_id} ({partner.business_registration_number})")

    claim = claims.SubmitClaim(
        claim_pb.SubmitClaimRequest(
            request_id=str(uuid.uuid4()),
            partner_id=partner.partner_id,
            items=[
                claim_pb.LossItem(
                    service=common.AFFECTED_SERVICE_KAKAOTALK_CHANNEL,
                    baseline_week_sales_krw=2_500_000,
                    outage_week_sales_krw=900_000,
                )
            ],
        ),
        metadata=metadata,
        timeout=10,
    ).claim
    check(
        claim.status == claim_pb.CLAIM_STATUS_APPROVED,
        f"claim {claim.claim_id} is {claim_pb.ClaimStatus.Name(claim.status)}, not APPROVED",
    )
    check(claim.disbursement_id, "an approved claim has no disbursement_id")
    print(
        f"claim {claim.claim_id}: {claim_pb.ClaimStatus.Name(claim.status)}, "
        f"recognised loss {claim.recognized_loss_krw} KRW, compensation "
        f"{claim.compensation_krw} KRW (policy {claim.policy_version})"
    )

    # The payout goes out in the background; read it until the bank has paid it.
    deadline = time.monotonic() + 30
    while True:
        payout = disbursements.GetDisbursement(
            disb_pb.GetDisbursementRequest(disbursement_id=claim.disbursement_id),
            metadata=metadata,
            timeout=10,
        ).disbursement
        status = disb_pb.DisbursementStatus.Name(payout.status)
        if payout.status == disb_pb.DISBURSEMENT_STATUS_PAID:
            break
        check(
            payout.status
            not in (disb_pb.DISBURSEMENT_STATUS_FAILED, disb_pb.DISBURSEMENT_STATUS_CANCELLED),
            f"payout {payout.disbursement_id} is {status}: {payout.failure_code}",
        )
        check(time.monotonic() < deadline, f"payout {payout.disbursement_id} still {status}")
        time.sleep(0.2)
    check(
        payout.amount_krw == claim.compensation_krw,
        f"paid {payout.amount_krw} KRW for a claim of {claim.compensation_krw} KRW",
    )
    print(f"payout {payout.disbursement_id}: {status}, {payout.amount_krw} KRW")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="the service's host:port")
    parser.add_argument("--token", help="a bearer token (with [auth]; none in local development)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out_dir:
        run(generate_stubs(out_dir), args.target, args.token)


if __name__ == "__main__":
    main()
