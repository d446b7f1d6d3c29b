//! Method `qatzip`: deflate offloaded to Intel QuickAssist through the QATzip library.
//! (Providers land with the qatzip issue.)

use super::{Codec, CodecError, Method};
use serde::{Deserialize, Serialize};

/// Local (not negotiated) options of the qatzip method.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QatzipOptions {}

pub fn open(_level: u8, _opts: &QatzipOptions) -> Result<Box<dyn Codec>, CodecError> {
    Err(CodecError::Setup { method: Method::Qatzip, detail: "not available in this build".into() })
}
