//! The Python extension module `egse.procman._native` (feature `python`): the only place pyo3 appears.
//!
//! Thin by design: each function parses its arguments, calls the library ([`crate::proxy`],
//! [`crate::objects`], [`crate::cli`], [`crate::config`]) and converts the result.

mod convert;
mod errors;
mod proxy;
mod serve;

use pyo3::prelude::*;

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<proxy::PyProxy>()?;
    m.add_class::<proxy::ProcessManagerProxy>()?;
    m.add_class::<proxy::ServiceProxy>()?;
    m.add_class::<proxy::DynamicCommand>()?;
    m.add_class::<convert::GlobalRef>()?;
    m.add_class::<convert::RemoteObject>()?;
    m.add_function(wrap_pyfunction!(serve::serve, m)?)?;
    m.add_function(wrap_pyfunction!(serve::load_settings, m)?)?;
    m.add_function(wrap_pyfunction!(serve::process_manager_settings, m)?)?;
    m.add_function(wrap_pyfunction!(serve::log_location, m)?)?;
    m.add_function(wrap_pyfunction!(serve::is_process_manager_active, m)?)?;
    m.add_function(wrap_pyfunction!(serve::is_control_server_active, m)?)?;
    m.add_function(wrap_pyfunction!(serve::cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(serve::render_markup, m)?)?;
    m.add_function(wrap_pyfunction!(serve::wrap_line, m)?)?;
    Ok(())
}
