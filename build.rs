//! Compiles the protos with protox (no system protoc) and writes the descriptor set for reflection.
use std::{env, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/payouts/v1/common.proto",
        "proto/payouts/v1/partner.proto",
        "proto/payouts/v1/claim.proto",
        "proto/payouts/v1/disbursement.proto",
        "proto/payouts/v1/audit.proto",
        "proto/payouts/v1/events.proto",
        "proto/payments/v1/payments.proto",
        "proto/google/rpc/error_details.proto",
        "proto/google/rpc/status.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    // The store embeds its migrations; a new one must rebuild it.
    println!("cargo:rerun-if-changed=migrations");
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // These carry full account numbers: their Debug (in src/proto.rs) masks them.
        .skip_debug([
            ".payouts.v1.BankAccount",
            ".payments.v1.VerifyAccountHolderRequest",
            ".payments.v1.SubmitInstructionRequest",
        ])
        .compile_fds(fds)?;
    Ok(())
}
